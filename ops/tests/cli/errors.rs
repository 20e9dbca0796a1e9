//! Every error path prints one clear line and exits with the documented
//! code: 1 API error, 2 usage, 3 cannot connect, 4 local.

use crate::support::{Node, Subnet, TOKEN, TempDir, edgectl, edgectl_env, edgectl_in};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_exit_1_with_the_envelope_message() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let node = Node::start(&net).await?;
    let api = node.url.as_str();

    // Unknown group.
    let run = edgectl(&["--api", api, "--token", TOKEN, "service", "get", "ghost"]).await?;
    assert_eq!(
        run.fails(1, "(HTTP 404)"),
        "edgectl: service group \"ghost\" not found (HTTP 404)"
    );
    edgectl(&[
        "--api", api, "--token", TOKEN, "instance", "detach", "ghost", "x",
    ])
    .await?
    .fails(1, "(HTTP 404)");

    // Wrong token.
    let run = edgectl(&[
        "--api",
        api,
        "--token",
        "not-the-token-at-all",
        "service",
        "ls",
    ])
    .await?;
    let line = run.fails(1, "(HTTP 401)");
    assert!(line.contains("--token or EDGELB_TOKEN"), "{line}");

    // Invalid input the server refuses (a bad name): 400.
    edgectl(&[
        "--api",
        api,
        "--token",
        TOKEN,
        "service",
        "create",
        "-n",
        "Bad_Name",
        "7200/http",
    ])
    .await?
    .fails(1, "(HTTP 400)");
    // A conflict: the same name twice.
    edgectl(&[
        "--api",
        api,
        "--token",
        TOKEN,
        "service",
        "create",
        "-n",
        "twice",
        "7300/http",
    ])
    .await?
    .ok()?;
    edgectl(&[
        "--api",
        api,
        "--token",
        TOKEN,
        "service",
        "create",
        "-n",
        "twice",
        "7301/http",
    ])
    .await?
    .fails(1, "(HTTP 409)");
    // A bad instance address.
    edgectl(&[
        "--api",
        api,
        "--token",
        TOKEN,
        "instance",
        "attach",
        "twice",
        "--address",
        "1.2.3.4:80",
    ])
    .await?
    .fails(1, "(HTTP 400)");

    // The token file of the default data dir, read from the working dir.
    let cwd = TempDir::new("tokenfile");
    std::fs::create_dir_all(cwd.path().join("edgelb-data"))?;
    std::fs::write(cwd.path().join("edgelb-data/token"), format!("{TOKEN}\n"))?;
    let run = edgectl_in(&["--api", api, "service", "ls"], &[], cwd.path())
        .await?
        .ok()?;
    assert!(run.stdout.contains("twice"), "{run:?}");
    // … or of $EDGELB_DATA_DIR.
    let dir = cwd.path().join("edgelb-data");
    let dir = dir.to_string_lossy();
    edgectl_env(
        &["--api", api, "service", "ls"],
        &[("EDGELB_DATA_DIR", &dir)],
    )
    .await?
    .ok()?;
    node.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    // Nothing listens here: usage errors must be found before connecting.
    let api = format!("http://{}:7070", net.ip(1));
    let with = |args: &[&'static str]| {
        let mut all = vec![
            "--api".to_owned(),
            api.clone(),
            "--token".to_owned(),
            TOKEN.to_owned(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        all
    };
    let run_args = |v: Vec<String>| async move {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        edgectl(&refs).await
    };

    let run = run_args(with(&["service", "create", "80:x"])).await?;
    assert_eq!(
        run.fails(2, "\"80:x\""),
        "edgectl: invalid port spec \"80:x\": expected EXT:INT or P with ports 1-65535"
    );
    run_args(with(&["service", "create", "443:8080/tls+gopher"]))
        .await?
        .fails(2, "\"gopher\"");
    run_args(with(&["service", "create", "80:443/http+redirect"]))
        .await?
        .fails(2, "invalid port spec \"80:443/http+redirect\"");
    run_args(with(&["service", "create", "8080/http", "8080/http"]))
        .await?
        .fails(2, "listed twice");

    // No token anywhere: a one-line hint.
    let run = edgectl(&["--api", &api, "service", "ls"]).await?;
    let line = run.fails(2, "no admin token");
    assert!(
        line.contains("--token") && line.contains("EDGELB_TOKEN"),
        "{line}"
    );

    // An https admin URL without the CA to verify it.
    edgectl(&[
        "--api",
        "https://127.0.0.1:7070",
        "--token",
        TOKEN,
        "service",
        "ls",
    ])
    .await?
    .fails(2, "pass the CA that signed its certificate with --cacert");

    // clap's own usage errors exit 2 too (its format, several lines).
    let run = edgectl(&["service", "create"]).await?;
    assert_eq!(run.code, 2, "{run:?}");
    let run = edgectl(&["service", "frobnicate"]).await?;
    assert_eq!(run.code, 2, "{run:?}");
    let run = edgectl(&["-o", "yaml", "service", "ls"]).await?;
    assert_eq!(run.code, 2, "{run:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_exits_3() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let api = format!("http://{}:7070", net.ip(1));
    let run = edgectl(&["--api", &api, "--token", TOKEN, "service", "ls"]).await?;
    assert_eq!(
        run.fails(3, "connection refused"),
        format!(
            "edgectl: cannot reach the admin API at {api}: connection refused (is edgelb running? set --api or EDGELB_API)"
        )
    );
    // Through EDGELB_API, for every kind of command.
    let env = [("EDGELB_API", api.as_str()), ("EDGELB_TOKEN", TOKEN)];
    for args in [
        &["cluster", "status"][..],
        &["instance", "list", "web"],
        &["service", "rm", "a", "b"],
        &["cluster", "remove-node", "2"],
    ] {
        edgectl_env(args, &env).await?.fails(3, &api);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_completions() -> anyhow::Result<()> {
    let help = edgectl(&["--help"]).await?.ok()?;
    for code in [
        "0  ok",
        "1  the admin API answered with an error",
        "2  usage error",
        "3  cannot connect",
        "4  local error",
    ] {
        assert!(help.stdout.contains(code), "{code}: {}", help.stdout);
    }
    let create = edgectl(&["service", "create", "--help"]).await?.ok()?;
    assert!(
        create
            .stdout
            .contains("443:INT/tls+http 80:443/http+redirect"),
        "{}",
        create.stdout
    );
    for shell in ["bash", "zsh", "fish"] {
        let run = edgectl(&["completions", shell]).await?.ok()?;
        assert!(run.stdout.contains("edgectl"), "{shell}");
        assert!(run.stdout.contains("add-node"), "{shell}: {}", run.stdout);
    }
    edgectl(&["completions", "tcsh"])
        .await
        .map(|r| assert_eq!(r.code, 2))?;
    Ok(())
}

/// The node's back-off on wrong tokens (`admin_auth_failures` from the
/// config), as edgectl shows it: a wrong token is exit 1 with HTTP 401 before
/// and after the address is held back, and the right token from that
/// address still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_tokens_are_still_401_and_the_right_token_works() -> anyhow::Result<()> {
    let net = Subnet::allocate();
    let node = Node::start_with(net.ip(1), |c| {
        c.admin_auth = edgelb::admin::AuthBackoff {
            failures: 2,
            ..edgelb::admin::AuthBackoff::default()
        };
    })
    .await?;
    let api = node.url.as_str();
    let wrong = "not-the-token-at-all";
    for _ in 0..3 {
        edgectl(&["--api", api, "--token", wrong, "service", "ls"])
            .await?
            .fails(1, "(HTTP 401)");
    }
    edgectl(&["--api", api, "--token", TOKEN, "service", "ls"])
        .await?
        .ok()?;
    node.stop().await;
    Ok(())
}
