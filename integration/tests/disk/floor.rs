//! A follower whose data dir falls below its free-space floor: it refuses
//! writes with 507 naming its data dir and says so on its probes, while the
//! cluster writes on without it, it keeps serving reads, and it catches up
//! by itself once space is back (played by moving the floor).

use std::time::Duration;

use edgelb::health::MinFree;
use http::{Method, StatusCode};
use integration::wait_until;

use crate::harness::{cluster, group};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_below_its_floor_refuses_writes_and_catches_up_once_space_is_back()
-> anyhow::Result<()> {
    let mut nodes = cluster(3, "floor-token").await?;
    let follower = &nodes[2];
    let health = follower.handle()?.health.clone();
    // Whatever the machine's disk, node 3 is now below its floor.
    health.set_min_free(MinFree::Share(99.999));

    let r = follower
        .client
        .request(Method::POST, "/v1/services", Some(&group("via-3")))
        .await?;
    assert_eq!(r.status, StatusCode::INSUFFICIENT_STORAGE, "{}", r.text());
    let dir = follower.config.data_dir.to_string_lossy().into_owned();
    assert!(r.text().contains(&dir), "{}", r.text());
    for probe in ["/healthz", "/readyz"] {
        let r = follower.client.request(Method::GET, probe, None).await?;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{probe}");
    }

    // The others write on; node 3 serves what it had and takes nothing.
    for i in 0..3 {
        let (status, v) = nodes[0]
            .client
            .post("/v1/services", &group(&format!("while-full-{i}")))
            .await?;
        assert!(status.is_success(), "{status} {v}");
    }
    let (status, _) = follower.client.get("/v1/services").await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !follower.groups().await?.contains("while-full-2"),
        "node 3 applied an entry while below its floor"
    );
    assert!(
        health.failure().is_none(),
        "the Raft core of node 3 stopped"
    );

    // Space back: node 3 catches up and writes again, without a restart.
    health.set_min_free(MinFree::Bytes(0));
    wait_until("node 3 to catch up", Duration::from_secs(20), || async {
        follower
            .groups()
            .await
            .is_ok_and(|g| (0..3).all(|i| g.contains(&format!("while-full-{i}"))))
    })
    .await?;
    let (status, v) = follower
        .client
        .post("/v1/services", &group("via-3"))
        .await?;
    assert!(status.is_success(), "{status} {v}");
    for node in nodes.iter_mut().rev() {
        node.stop().await?;
    }
    Ok(())
}
