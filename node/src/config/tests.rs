use clap::Parser;

use super::*;

fn load(args: &[&str]) -> Result<Config, ConfigError> {
    let mut argv = vec!["edgelb"];
    argv.extend_from_slice(args);
    Config::load(Args::try_parse_from(argv).map_err(|e| ConfigError::new("flags", e.to_string()))?)
}

#[test]
fn defaults_are_the_embedded_one_node_cluster() {
    let c = load(&[]).unwrap();
    assert_eq!(c.node_id, 1);
    assert_eq!(c.admin_addr.to_string(), "127.0.0.1:7070");
    assert_eq!(c.cluster_addr.to_string(), "127.0.0.1:7071");
    assert_eq!(c.listen_ip.to_string(), "127.0.0.1");
    assert_eq!(c.data_dir, PathBuf::from("./edgelb-data"));
    assert_eq!(c.cluster_domain, "edgelb.local");
    assert_eq!(c.settings.drain_timeout, Duration::from_secs(30));
}

#[test]
fn flags_override_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("a.toml");
    std::fs::write(
        &path,
        "node_id = 7\nregion = \"fra\"\nupstream_timeout = \"5s\"\n",
    )
    .unwrap();
    let c = load(&["--config", path.to_str().unwrap(), "--region", "ams"]).unwrap();
    assert_eq!(c.node_id, 7);
    assert_eq!(c.region, "ams");
    assert_eq!(c.settings.upstream_timeout, Duration::from_secs(5));
}

#[test]
fn errors_name_the_field() {
    assert_eq!(
        load(&["--admin-addr", "nope"]).unwrap_err().field,
        "admin_addr"
    );
    assert_eq!(
        load(&["--listen-ip", "1.2.3"]).unwrap_err().field,
        "listen_ip"
    );
    assert_eq!(
        load(&["--drain-timeout", "10 parsecs"]).unwrap_err().field,
        "drain_timeout"
    );
    // SPEC sets no length: a short token starts (with a warning at start);
    // an empty one, or one a header cannot carry, does not.
    assert_eq!(
        load(&["--token", "short"]).unwrap().token.as_deref(),
        Some("short")
    );
    assert!(short_token_warning("token", "short").is_some());
    assert!(short_token_warning("token", "sixteen-chars-ok").is_none());
    for bad in ["", "with space", "t\u{e9}l\u{e9}", &"x".repeat(257)] {
        assert_eq!(
            load(&["--token", bad]).unwrap_err().field,
            "token",
            "{bad:?}"
        );
    }
    // A founder may be node 0; a joining node may not.
    assert_eq!(load(&["--node-id", "0"]).unwrap().node_id, 0);
    let join0 = ["--node-id", "0", "--join", "http://127.0.0.1:7070"];
    assert_eq!(load(&join0).unwrap_err().field, "node_id");
    for bad in [
        "nope",
        "host:",
        ":7070",
        "::1:7070",
        "a b:7070",
        "host:99999",
    ] {
        let err = load(&["--admin-addr", bad]).unwrap_err();
        assert_eq!(err.field, "admin_addr", "{bad}");
        assert!(err.message.contains("HOST:PORT"), "{bad}: {err}");
    }
    let join0 = "node_id = 0\njoin = \"http://127.0.0.1:7070\"";
    assert_eq!(from_toml(join0).unwrap_err().field, "node_id");
    assert_eq!(load(&["--join", "ftp://x"]).unwrap_err().field, "join");
    let err = load(&[
        "--admin-addr",
        "127.0.0.1:9",
        "--cluster-addr",
        "127.0.0.1:9",
    ])
    .unwrap_err();
    assert_eq!(err.field, "cluster_addr");
}

#[test]
fn advertise_cluster_addr_defaults_to_the_bound_one() {
    let bound: SocketAddr = "127.0.0.1:7071".parse().unwrap();
    let c = load(&[]).unwrap();
    assert_eq!(c.advertise_cluster_addr, None);
    assert_eq!(c.advertised_cluster_addr(bound), bound);
    let c = load(&["--advertise-cluster-addr", "203.0.113.7:17071"]).unwrap();
    assert_eq!(
        c.advertised_cluster_addr(bound).to_string(),
        "203.0.113.7:17071"
    );
    for bad in ["nope", "example.com:7071", "0.0.0.0:7071", "10.0.0.1:0"] {
        let err = load(&["--advertise-cluster-addr", bad]).unwrap_err();
        assert_eq!(err.field, "advertise_cluster_addr", "{bad}: {err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("a.toml");
    std::fs::write(&path, "advertise_cluster_addr = \"10.9.8.7:7071\"\n").unwrap();
    let c = load(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(
        c.advertised_cluster_addr(bound).to_string(),
        "10.9.8.7:7071"
    );
}

#[test]
fn file_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("b.toml");
    std::fs::write(&path, "node_id = \"one\"\n").unwrap();
    assert_eq!(
        load(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .field,
        "node_id"
    );
    std::fs::write(&path, "colour = 1\n").unwrap();
    let err = load(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(err.message.contains("colour"), "{err}");
}

#[test]
fn gossip_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("g.toml");
    let c = load(&[]).unwrap();
    assert_eq!(c.gossip.min_interval, Duration::from_millis(5));
    assert_eq!(c.gossip.interval, Duration::from_millis(100));
    assert_eq!(c.gossip.ttl, Duration::from_secs(1));
    std::fs::write(
        &path,
        "gossip_min_interval = \"2ms\"\ngossip_interval = \"50ms\"\ngossip_ttl = \"500ms\"\n",
    )
    .unwrap();
    let c = load(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.gossip.min_interval, Duration::from_millis(2));
    assert_eq!(c.gossip.interval, Duration::from_millis(50));
    assert_eq!(c.gossip.ttl, Duration::from_millis(500));
    assert!(!c.gossip_local);
    std::fs::write(&path, "gossip_estimator = \"local\"\n").unwrap();
    assert!(
        load(&["--config", path.to_str().unwrap()])
            .unwrap()
            .gossip_local
    );
    std::fs::write(&path, "gossip_estimator = \"decay\"\n").unwrap();
    let c = load(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.gossip.estimator, gossip::Estimator::Decay);
    for (text, field) in [
        ("gossip_ttl = \"100ms\"\n", "gossip_interval"),
        ("gossip_min_interval = \"200ms\"\n", "gossip_min_interval"),
        ("gossip_interval = \"0ms\"\n", "gossip_interval"),
        ("gossip_ttl = \"soon\"\n", "gossip_ttl"),
        ("gossip_estimator = \"psychic\"\n", "gossip_estimator"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = load(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert_eq!(err.field, field, "{text}: {err}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("s"), None);
    assert_eq!(parse_duration("5"), None);
    assert_eq!(parse_duration("99999999999999999999h"), None);
    // Months and years are refused: `5M` is not five minutes.
    assert_eq!(parse_duration("5m 5s"), Some(Duration::from_secs(305)));
    for calendar in ["5M", "1y", "2months", "1 year", "1h 1M"] {
        assert_eq!(parse_duration(calendar), None, "{calendar}");
    }
}

#[test]
fn client_timeouts_and_trusted_proxies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("c.toml");
    let c = load(&[]).unwrap();
    assert_eq!(c.settings.send_timeout, Duration::from_secs(60));
    assert_eq!(c.settings.tunnel_idle_timeout, Duration::from_secs(3600));
    assert!(c.settings.trusted_proxies.is_empty());
    assert_eq!(c.settings.admin_max_connections, 256);
    assert_eq!(c.metrics_token, None);
    let c = load(&["--metrics-token", "scrape-0123456789abcdef"]).unwrap();
    assert_eq!(c.metrics_token.as_deref(), Some("scrape-0123456789abcdef"));
    assert_eq!(
        load(&["--metrics-token", "with space"]).unwrap_err().field,
        "metrics_token"
    );
    assert!(!c.max_connections_explicit);
    std::fs::write(
        &path,
        "send_timeout = \"5s\"\ntunnel_idle_timeout = \"10m\"\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n",
    )
    .unwrap();
    let c = load(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.settings.send_timeout, Duration::from_secs(5));
    assert_eq!(c.settings.tunnel_idle_timeout, Duration::from_secs(600));
    let trusted = &c.settings.trusted_proxies;
    assert_eq!(trusted.len(), 3);
    assert!(trusted[0].contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
    assert!(trusted[1].contains(&"192.0.2.7".parse::<IpAddr>().unwrap()));
    assert!(!trusted[1].contains(&"192.0.2.8".parse::<IpAddr>().unwrap()));
    // The data plane's threads and parking.
    assert_eq!(c.settings.park_after, Duration::from_millis(250));
    assert!(c.settings.workers >= 1);
    std::fs::write(&path, "park_after = \"0s\"\nworkers = 3\n").unwrap();
    let c = load(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.settings.park_after, Duration::ZERO, "0s parks at once");
    assert_eq!(c.settings.workers, 3);
    for (text, field) in [
        ("workers = 0\n", "workers"),
        ("park_after = \"soon\"\n", "park_after"),
        ("trusted_proxies = [\"10.0.0.0/33\"]\n", "trusted_proxies"),
        ("trusted_proxies = [\"proxy.example\"]\n", "trusted_proxies"),
        ("send_timeout = \"0s\"\n", "send_timeout"),
        ("admin_max_connections = 0\n", "admin_max_connections"),
        ("tunnel_idle_timeout = \"forever\"\n", "tunnel_idle_timeout"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = load(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert_eq!(err.field, field, "{text}: {err}");
    }
}

#[test]
fn admin_auth_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("c.toml");
    let c = load(&[]).unwrap();
    assert_eq!(c.admin_auth, AuthBackoff::default());
    assert_eq!(c.admin_auth.failures, 10);
    std::fs::write(
        &path,
        "admin_auth_failures = 3\nadmin_auth_window = \"10s\"\nadmin_auth_block = \"2s\"\nadmin_auth_block_max = \"1m\"\n",
    )
    .unwrap();
    let c = load(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(c.admin_auth.failures, 3);
    assert_eq!(c.admin_auth.window, Duration::from_secs(10));
    assert_eq!(c.admin_auth.block, Duration::from_secs(2));
    assert_eq!(c.admin_auth.block_max, Duration::from_secs(60));
    for (text, field) in [
        ("admin_auth_failures = -1\n", "admin_auth_failures"),
        ("admin_auth_window = \"0s\"\n", "admin_auth_window"),
        ("admin_auth_block = \"1h\"\n", "admin_auth_block"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = load(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert_eq!(err.field, field, "{text}: {err}");
    }
}

#[test]
fn admin_tls_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert_eq!(load(&[]).unwrap().admin_tls, None);
    assert_eq!(
        load(&["--admin-tls"]).unwrap().admin_tls,
        Some(AdminTls::Node)
    );
    let one = rcgen::generate_simple_self_signed(vec!["admin.example".to_owned()]).unwrap();
    let two = rcgen::generate_simple_self_signed(vec!["admin.example".to_owned()]).unwrap();
    let cert = dir.join("admin.pem");
    let key = dir.join("admin.key");
    let other_key = dir.join("other.key");
    std::fs::write(&cert, one.cert.pem()).unwrap();
    std::fs::write(&key, one.key_pair.serialize_pem()).unwrap();
    std::fs::write(&other_key, two.key_pair.serialize_pem()).unwrap();
    let (c, k, o) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        other_key.to_str().unwrap(),
    );
    assert_eq!(
        load(&["--admin-tls-cert", c, "--admin-tls-key", k])
            .unwrap()
            .admin_tls,
        Some(AdminTls::Files {
            cert: cert.clone(),
            key: key.clone()
        })
    );
    let field = |args: &[&str]| load(args).unwrap_err().field;
    assert_eq!(field(&["--admin-tls-cert", c]), "admin_tls_cert");
    assert_eq!(
        field(&["--admin-tls-cert", c, "--admin-tls-key", o]),
        "admin_tls_key"
    );
    assert_eq!(
        field(&["--admin-tls-cert", k, "--admin-tls-key", k]),
        "admin_tls_cert"
    );
    let missing = dir.join("missing.pem");
    assert_eq!(
        field(&[
            "--admin-tls-cert",
            missing.to_str().unwrap(),
            "--admin-tls-key",
            k
        ]),
        "admin_tls_cert"
    );
    let toml = dir.join("c.toml");
    std::fs::write(
        &toml,
        format!("admin_tls = false\nadmin_tls_cert = {c:?}\nadmin_tls_key = {k:?}\n"),
    )
    .unwrap();
    assert_eq!(field(&["--config", toml.to_str().unwrap()]), "admin_tls");

    // An https:// join needs a CA to verify the member with.
    let token = "join-token-0123456789";
    let join = ["--join", "https://10.0.0.1:7070", "--token", token];
    assert_eq!(field(&join), "join_ca_cert");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, crate::cluster::pki::generate_ca("t").unwrap().cert_pem).unwrap();
    let ca = ca.to_str().unwrap();
    let with_ca = [&join[..], &["--join-ca-cert", ca]].concat();
    assert!(load(&with_ca).unwrap().join_tls.is_some());
    let not_pem = [&join[..], &["--join-ca-cert", k]].concat();
    assert_eq!(field(&not_pem), "join_ca_cert");
    let plain = ["--join", "http://10.0.0.1:7070", "--token", token];
    assert!(load(&plain).unwrap().join_tls.is_none());
}

/// The file's keys, as [`Config::load`] reads them from `path`.
/// A config file holding `text` in a directory of its own (removed when
/// the first value is dropped), and its path.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("edgelb.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (tmp, path)
}

fn from_toml(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("edgelb.toml"))
}

#[test]
fn layers_defaults_then_file_then_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("l.toml");
    std::fs::write(
        &path,
        "node_id = 7\nregion = \"fra\"\ndrain_timeout = \"5s\"\nmax_voters = 3\n\
         admin_tls = true\nleave_on_exit = true\nidle_timeout = \"2m\"\n",
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let c = load(&["--config", file, "--region", "ams", "--drain-timeout", "1m"]).unwrap();
    // Set by a flag: the flag's.
    assert_eq!(c.region, "ams");
    assert_eq!(c.settings.drain_timeout, Duration::from_secs(60));
    // Set by the file alone (a switch flag that is off leaves it).
    assert_eq!(c.node_id, 7);
    assert_eq!(c.max_voters, 3);
    assert_eq!(c.admin_tls, Some(AdminTls::Node));
    assert!(c.leave_on_exit);
    assert_eq!(c.settings.idle_timeout, Duration::from_secs(120));
    // Set by neither: the default.
    assert_eq!(c.cluster_domain, "edgelb.local");
    assert_eq!(c.settings.upstream_timeout, Duration::from_secs(60));

    // A switch flag turns on what the file turned off.
    std::fs::write(&path, "admin_tls = false\nleave_on_exit = false\n").unwrap();
    assert_eq!(load(&["--config", file]).unwrap().admin_tls, None);
    let c = load(&["--config", file, "--admin-tls", "--leave-on-exit"]).unwrap();
    assert_eq!(c.admin_tls, Some(AdminTls::Node));
    assert!(c.leave_on_exit);

    // The flags' node id is a u64 (wider than a TOML integer).
    let c = load(&["--config", file, "--node-id", "18446744073709551615"]).unwrap();
    assert_eq!(c.node_id, u64::MAX);
}

#[test]
fn a_value_a_flag_replaces_is_not_used() {
    let (_tmp, file) = config_file("admin_addr = \"nope\"\n");
    let file = file.as_str();
    let err = load(&["--config", file]).unwrap_err();
    assert_eq!(err.field, "admin_addr");
    assert!(err.message.contains(file), "{err}");
    let c = load(&["--config", file, "--admin-addr", "127.0.0.1:1"]).unwrap();
    assert_eq!(c.admin_addr.to_string(), "127.0.0.1:1");
    // An unknown key is an error whatever the flags.
    std::fs::write(file, "colour = \"blue\"\n").unwrap();
    assert_eq!(
        load(&["--config", file, "--region", "ams"])
            .unwrap_err()
            .field,
        "colour"
    );
}

#[test]
fn a_bad_duration_names_its_field() {
    let keys = [
        "drain_timeout",
        "header_timeout",
        "connect_timeout",
        "upstream_timeout",
        "idle_timeout",
        "tcp_idle_timeout",
        "send_timeout",
        "tunnel_idle_timeout",
        "admin_auth_window",
        "admin_auth_block",
        "admin_auth_block_max",
        "gossip_min_interval",
        "gossip_interval",
        "gossip_ttl",
        "raft_heartbeat_interval",
        "election_timeout",
        "node_cert_lifetime",
    ];
    for key in keys {
        for value in ["\"5 fortnights\"", "\"0s\"", "\"\"", "30", "\"1e3s\""] {
            let err = from_toml(&format!("{key} = {value}\n")).unwrap_err();
            assert_eq!(err.field, key, "{key} = {value}: {err}");
            assert!(err.to_string().contains(key), "{err}");
        }
    }
    let err = load(&["--drain-timeout", "5 fortnights"]).unwrap_err();
    assert_eq!(err.field, "drain_timeout");
    assert_eq!(
        err.to_string(),
        "config: drain_timeout: \"5 fortnights\" is not a duration like 500ms, 30s, 5m or 1h"
    );
    assert_eq!(
        load(&["--drain-timeout", "0ms"]).unwrap_err().to_string(),
        "config: drain_timeout: must be greater than zero"
    );
}

#[test]
fn durations_as_before_and_in_humantime_syntax() {
    let c = from_toml(
        "drain_timeout = \"500ms\"\nidle_timeout = \"2s\"\nsend_timeout = \"1m\"\n\
         tcp_idle_timeout = \"2h\"\nnode_cert_lifetime = \"90d\"\n\
         upstream_timeout = \"1m 30s\"\nheader_timeout = \" 10s \"\n\
         connect_timeout = \"1500ms\"\n",
    )
    .unwrap();
    let s = &c.settings;
    assert_eq!(s.drain_timeout, Duration::from_millis(500));
    assert_eq!(s.idle_timeout, Duration::from_secs(2));
    assert_eq!(s.send_timeout, Duration::from_secs(60));
    assert_eq!(s.tcp_idle_timeout, Duration::from_secs(7200));
    assert_eq!(c.node_cert_lifetime, Duration::from_secs(90 * 86_400));
    assert_eq!(s.upstream_timeout, Duration::from_secs(90));
    assert_eq!(s.header_timeout, Duration::from_secs(10));
    assert_eq!(s.connect_timeout, Duration::from_millis(1500));
    assert_eq!(parse_duration("2min"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
    // No deadline computed from a duration may overflow.
    assert_eq!(parse_duration("500000000000y"), None);
}

#[test]
fn file_type_errors_name_the_key() {
    for (text, field) in [
        ("node_id = -1\n", "node_id"),
        ("region = 5\n", "region"),
        ("listen_ip = \"1.2.3\"\n", "listen_ip"),
        ("data_dir_min_free = \"lots\"\n", "data_dir_min_free"),
        ("max_connections = \"many\"\n", "max_connections"),
        ("admin_tls = \"yes\"\n", "admin_tls"),
        ("trusted_proxies = \"10.0.0.0/8\"\n", "trusted_proxies"),
        ("gossip_ttl = 1979-05-27\n", "gossip_ttl"),
        ("max_voters = nan\n", "max_voters"),
        ("rebuild_state_machine = true\n", "rebuild_state_machine"),
        ("config = \"other.toml\"\n", "config"),
        ("node_id = \n", "node_id"),
    ] {
        let err = from_toml(text).unwrap_err();
        assert_eq!(err.field, field, "{text}: {err}");
        assert!(err.message.contains("edgelb.toml"), "{text}: {err}");
    }
}

#[test]
fn access_log_and_log_format_keys() {
    use crate::access_log::{Format, Options, Target};
    let c = load(&[]).unwrap();
    assert_eq!(c.access_log, None, "off by default");
    assert_eq!(c.log_format, LogFormat::Text);
    let c = load(&["--access-log", "stdout", "--log-format", "json"]).unwrap();
    assert_eq!(
        c.access_log,
        Some(Options {
            target: Target::Stdout,
            format: Format::Json,
            sample: 1.0,
        })
    );
    assert_eq!(c.log_format, LogFormat::Json);
    let c = from_toml(
        "access_log = \"/var/log/edgelb/access.log\"\naccess_log_format = \"text\"\n\
         access_log_sample = 0.25\n",
    )
    .unwrap();
    assert_eq!(
        c.access_log,
        Some(Options {
            target: Target::File("/var/log/edgelb/access.log".into()),
            format: Format::Text,
            sample: 0.25,
        })
    );
    // `off` keeps the other keys in the file without effect.
    let c = from_toml("access_log = \"off\"\naccess_log_format = \"text\"\n").unwrap();
    assert_eq!(c.access_log, None);
    for (text, field) in [
        ("access_log_format = \"json\"\n", "access_log_format"),
        (
            "access_log = \"stdout\"\naccess_log_sample = 0\n",
            "access_log_sample",
        ),
        (
            "access_log = \"stdout\"\naccess_log_sample = 1.5\n",
            "access_log_sample",
        ),
        (
            "access_log = \"stdout\"\naccess_log_format = \"xml\"\n",
            "access_log_format",
        ),
        ("access_log = \"\"\n", "access_log"),
        ("log_format = \"yaml\"\n", "log_format"),
    ] {
        assert_eq!(from_toml(text).unwrap_err().field, field, "{text}");
    }
    assert_eq!(
        load(&["--access-log", "stdout", "--access-log-sample", "2"])
            .unwrap_err()
            .field,
        "access_log_sample"
    );
    assert!(load(&["--access-log", "stdout", "--access-log-sample", "nan"]).is_err());
}

#[test]
fn accept_proxy_protocol_ports() {
    let c = from_toml("accept_proxy_protocol = [443, 80, 443]\n").unwrap();
    assert_eq!(c.settings.accept_proxy_protocol, vec![80, 443]);
    assert!(load(&[]).unwrap().settings.accept_proxy_protocol.is_empty());
    for bad in ["[0]", "[70000]", "[\"443\"]", "443"] {
        let err = from_toml(&format!("accept_proxy_protocol = {bad}\n")).unwrap_err();
        assert_eq!(err.field, "accept_proxy_protocol", "{bad}");
    }
}

#[test]
fn restore_flags() {
    use crate::restore::Restore;
    let token = "a-cluster-token-0123456789";
    let c = load(&["--restore", "/tmp/b.json", "--token", token]).unwrap();
    assert_eq!(c.restore, Some(Restore::File("/tmp/b.json".into())));
    let c = load(&["--force-new-cluster", "--token", token]).unwrap();
    assert_eq!(c.restore, Some(Restore::ForceNewCluster));
    assert_eq!(load(&[]).unwrap().restore, None);
    assert_eq!(
        load(&["--force-new-cluster"]).unwrap_err().field,
        "token",
        "a restore needs the cluster's token"
    );
    let join = [
        "--force-new-cluster",
        "--token",
        token,
        "--join",
        "http://10.0.0.1:7070",
    ];
    assert_eq!(load(&join).unwrap_err().field, "join");
    // One or the other.
    assert!(
        load(&[
            "--restore",
            "/tmp/b.json",
            "--force-new-cluster",
            "--token",
            token
        ])
        .is_err()
    );
}

/// [`Config::load_with`] with `vars` as the only variables of keys without
/// a flag (and the only ones set, for a switch's: clap does not see them,
/// so a switch given by one must be `false`).
fn load_vars(args: &[&str], vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut argv = vec!["edgelb"];
    argv.extend_from_slice(args);
    let args = Args::try_parse_from(argv).map_err(|e| ConfigError::new("flags", e.to_string()))?;
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::load_with(args, |name| {
        vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.into())
    })
}

/// A switch's variable set to `false` turns off what the file turned on
/// (variables sit above the file); not set, the file's value stands.
#[test]
fn a_switch_variable_set_to_false_beats_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("on.toml");
    std::fs::write(&path, "admin_tls = true\nleave_on_exit = true\n").unwrap();
    let file = path.to_str().unwrap();
    let c = load_vars(
        &["--config", file],
        &[
            ("EDGELB_ADMIN_TLS", "false"),
            ("EDGELB_LEAVE_ON_EXIT", "false"),
        ],
    )
    .unwrap();
    assert_eq!(c.admin_tls, None);
    assert!(!c.leave_on_exit);
    let c = load_vars(&["--config", file], &[("EDGELB_LEAVE_ON_EXIT", "false")]).unwrap();
    assert_eq!(c.admin_tls, Some(AdminTls::Node));
    assert!(!c.leave_on_exit);
    let c = load_vars(&["--config", file], &[]).unwrap();
    assert_eq!(c.admin_tls, Some(AdminTls::Node));
    assert!(c.leave_on_exit);
    // Off by its variable against the file's certificate: the error names
    // the variable, where the operator set it.
    std::fs::write(
        &path,
        "admin_tls_cert = \"/c.pem\"\nadmin_tls_key = \"/k.pem\"\n",
    )
    .unwrap();
    let e = load_vars(&["--config", file], &[("EDGELB_ADMIN_TLS", "false")]).unwrap_err();
    assert_eq!(e.field, "admin_tls");
    assert!(e.message.starts_with("EDGELB_ADMIN_TLS: "), "{e}");
}

#[test]
fn keys_without_a_flag_read_their_variables() {
    let c = load_vars(
        &[],
        &[
            ("EDGELB_GOSSIP_INTERVAL", "50ms"),
            ("EDGELB_WORKERS", "3"),
            ("EDGELB_TRUSTED_PROXIES", "[\"10.0.0.0/8\", \"192.0.2.1\"]"),
            ("EDGELB_ACCEPT_PROXY_PROTOCOL", "[443, 80]"),
            ("EDGELB_PARK_AFTER", "0s"),
            ("EDGELB_GOSSIP_ESTIMATOR", "local"),
        ],
    )
    .unwrap();
    assert_eq!(c.gossip.interval, Duration::from_millis(50));
    assert_eq!(c.settings.workers, 3);
    assert_eq!(c.settings.trusted_proxies.len(), 2);
    assert_eq!(c.settings.accept_proxy_protocol, vec![80, 443]);
    assert!(c.gossip_local);
    assert_eq!(c.settings.park_after, Duration::ZERO);
    // Unset: the default.
    assert_eq!(c.settings.upstream_timeout, Duration::from_secs(60));

    // A list key also takes its items separated by commas, or one item.
    let c = load_vars(
        &[],
        &[
            ("EDGELB_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1"),
            ("EDGELB_ACCEPT_PROXY_PROTOCOL", "443"),
        ],
    )
    .unwrap();
    assert_eq!(c.settings.trusted_proxies.len(), 2);
    assert_eq!(c.settings.accept_proxy_protocol, vec![443]);
}

#[test]
fn variables_sit_between_the_file_and_the_flags() {
    let (_tmp, file) = config_file("idle_timeout = \"2m\"\nworkers = 1\n");
    let file = file.as_str();
    // A variable replaces the file's key; the file keeps the others.
    let c = load_vars(&["--config", file], &[("EDGELB_IDLE_TIMEOUT", "5m")]).unwrap();
    assert_eq!(c.settings.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.settings.workers, 1);
    // A flag's variable is the flag's own (clap reads it): not read here
    // again, so the flag given on the command line wins over anything.
    let c = load_vars(&["--region", "ams"], &[("EDGELB_REGION", "fra")]).unwrap();
    assert_eq!(c.region, "ams");
}

#[test]
fn a_bad_variable_names_its_key_and_itself() {
    let err = load_vars(&[], &[("EDGELB_GOSSIP_TTL", "soon")]).unwrap_err();
    assert_eq!(err.field, "gossip_ttl");
    assert!(err.message.contains("EDGELB_GOSSIP_TTL"), "{err}");
    // Text where a number is wanted is an error; a TOML string is text.
    let err = load_vars(&[], &[("EDGELB_WORKERS", "many")]).unwrap_err();
    assert_eq!(err.field, "workers");
    assert!(err.message.contains("EDGELB_WORKERS"), "{err}");
    let c = load_vars(&[], &[("EDGELB_SEND_TIMEOUT", "\"15s\"")]).unwrap();
    assert_eq!(c.settings.send_timeout, Duration::from_secs(15));
    // A value is all of the variable: nothing after it passes unseen.
    for garbage in ["1\nmax_connections = 2", "3 # three", "2 3"] {
        let err = load_vars(&[], &[("EDGELB_WORKERS", garbage)]).unwrap_err();
        assert_eq!(err.field, "workers", "{garbage:?}");
    }
    // Empty is a value, as clap takes a flag's empty variable.
    let err = load_vars(&[], &[("EDGELB_UPSTREAM_TIMEOUT", "")]).unwrap_err();
    assert_eq!(err.field, "upstream_timeout");
    // A duration without its unit is reported as one.
    let err = load_vars(&[], &[("EDGELB_IDLE_TIMEOUT", "30")]).unwrap_err();
    assert!(err.message.contains("is not a duration"), "{err}");
    // The same checks as the file's: zero workers is refused, and the
    // error says where the zero came from.
    let err = load_vars(&[], &[("EDGELB_WORKERS", "0")]).unwrap_err();
    assert_eq!(err.field, "workers");
    assert!(err.message.contains("EDGELB_WORKERS"), "{err}");
    // As a file's zero names the file.
    let err = from_toml("workers = 0").unwrap_err();
    assert!(err.message.contains("edgelb.toml"), "{err}");
}

#[test]
fn addresses_take_a_host_name() {
    // `localhost` is in every /etc/hosts: no DNS server is asked.
    let c = load(&[
        "--admin-addr",
        "localhost:17070",
        "--cluster-addr",
        "[::1]:17071",
        "--advertise-cluster-addr",
        "localhost:17072",
    ])
    .unwrap();
    assert_eq!(c.admin_addr.to_string(), "127.0.0.1:17070");
    assert_eq!(c.cluster_addr.to_string(), "[::1]:17071");
    assert_eq!(
        c.advertise_cluster_addr.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:17072")
    );
}
