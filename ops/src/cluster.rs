//! `edgectl cluster status|add-node|remove-node`: the `/v1/cluster` routes.

use std::path::Path;

use edgelb_api::cluster::{BackupData, ClusterData, NodeView};
use serde_json::{Value, json};

use crate::cli::ClusterCmd;
use crate::error::{Failure, Outcome};
use crate::output::{self, Format};
use crate::{Ctx, emit};

/// Runs `edgectl cluster status|add-node|remove-node`.
pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> Outcome {
    let client = ctx.client()?;
    match cmd {
        ClusterCmd::Status => {
            let data: ClusterData = client.get("/v1/cluster").await?;
            emit(&render_status(&data, ctx.format(Format::Table)));
        }
        ClusterCmd::AddNode {
            node_id,
            cluster_addr,
            admin_addr,
            region,
        } => {
            let body = json!({
                "node_id": node_id,
                "cluster_addr": cluster_addr,
                "admin_addr": admin_addr,
                "region": region,
            });
            let data: Value = client.post("/v1/cluster/nodes", &body).await?;
            if ctx.global.output == Some(Format::Json) {
                emit(&output::json(&data));
            } else {
                emit(&format!(
                    "added node {node_id} ({region}, cluster {cluster_addr}, admin {admin_addr}) as a learner; start it with --join and the cluster's token\n"
                ));
            }
        }
        ClusterCmd::RemoveNode { id } => {
            let data: Value = client.delete(&format!("/v1/cluster/nodes/{id}")).await?;
            if ctx.global.output == Some(Format::Json) {
                emit(&output::json(&data));
            } else {
                emit(&format!("removed node {id}\n"));
            }
        }
        ClusterCmd::Backup { file, stale, force } => {
            let path = if stale {
                "/v1/cluster/backup"
            } else {
                "/v1/cluster/backup?consistent=true"
            };
            let data: BackupData = client.get(path).await?;
            let b = &data.backup;
            let text = serde_json::to_string_pretty(b)
                .map_err(|e| Failure::local(format!("encoding the backup: {e}")))?;
            write_backup(&file, &format!("{text}\n"), force)?;
            let instances: usize = b.groups.iter().map(|g| g.instances.len()).sum();
            if ctx.global.output == Some(Format::Json) {
                emit(&output::json(&json!({
                    "file": file.display().to_string(),
                    "node_id": b.node_id,
                    "applied_index": b.applied_index,
                    "groups": b.groups.len(),
                    "instances": instances,
                    "certificates": b.certificates.len(),
                })));
            } else {
                emit(&format!(
                    "wrote {}: {} groups, {instances} instances, {} certificates, applied index {} of node {}; it holds the cluster CA's key: keep it secret\n",
                    file.display(),
                    b.groups.len(),
                    b.certificates.len(),
                    b.applied_index,
                    b.node_id
                ));
            }
        }
        ClusterCmd::Local(_) => {
            return Err(Failure::usage("cluster local is not an API command"));
        }
    }
    Ok(())
}

/// `cluster status` in `format`: a summary line and a table of members, a
/// block per member, or the API's `data`.
pub fn render_status(data: &ClusterData, format: Format) -> String {
    let c = &data.cluster;
    let leader = c
        .leader_id
        .map_or_else(|| "none".to_owned(), |l| l.to_string());
    let gossip = |n: &NodeView| {
        if n.node_id == c.node_id {
            "-".to_owned()
        } else {
            n.last_gossip_age_ms.map_or("-".to_owned(), output::millis)
        }
    };
    match format {
        Format::Json => output::json(data),
        Format::List => {
            let head = output::block(&[
                ("node", c.node_id.to_string()),
                ("leader", leader),
                ("term", c.term.to_string()),
                ("commit index", c.commit_index.to_string()),
                ("applied index", c.applied_index.to_string()),
                ("members", c.nodes.len().to_string()),
            ]);
            let nodes = c.nodes.iter().map(|n| {
                output::block(&[
                    ("node id", n.node_id.to_string()),
                    ("region", n.region.clone()),
                    ("role", n.role.to_string()),
                    ("leader", n.is_leader.to_string()),
                    ("cluster addr", n.cluster_addr.clone()),
                    ("admin addr", n.admin_addr.clone()),
                    ("gossip age", gossip(n)),
                ])
            });
            output::blocks(std::iter::once(head).chain(nodes))
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = c
                .nodes
                .iter()
                .map(|n| {
                    let mut id = n.node_id.to_string();
                    if n.node_id == c.node_id {
                        id.push('*');
                    }
                    vec![
                        id,
                        n.region.clone(),
                        n.role.to_string(),
                        if n.is_leader { "yes" } else { "" }.to_owned(),
                        n.cluster_addr.clone(),
                        n.admin_addr.clone(),
                        gossip(n),
                    ]
                })
                .collect();
            format!(
                "node {} sees leader {leader}, term {}, commit index {}, applied index {} (* = this node)\n{}",
                c.node_id,
                c.term,
                c.commit_index,
                c.applied_index,
                output::table(
                    &[
                        "NODE",
                        "REGION",
                        "ROLE",
                        "LEADER",
                        "CLUSTER ADDR",
                        "ADMIN ADDR",
                        "GOSSIP AGE"
                    ],
                    &rows
                )
            )
        }
    }
}

/// Writes a backup to `path` (mode 0600) through a temporary file beside
/// it, renamed over `path` once complete and synced: an existing backup is
/// replaced whole (with `force`) or kept, never left half-written.
fn write_backup(path: &Path, contents: &str, force: bool) -> Outcome {
    if !force && path.exists() {
        return Err(Failure::local(format!(
            "{} exists (use --force to replace it)",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = crate::certs::write(&tmp, contents, true, true).and_then(|()| {
        std::fs::rename(&tmp, path)
            .map_err(|e| Failure::local(format!("writing {}: {e}", path.display())))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let data: ClusterData = serde_json::from_value(json!({"cluster": {
            "node_id": 1, "leader_id": 1, "term": 3, "commit_index": 9, "applied_index": 9,
            "nodes": [
                {"node_id": 1, "region": "fra", "cluster_addr": "10.0.0.1:7071", "admin_addr": "10.0.0.1:7070",
                 "role": "voter", "is_leader": true, "last_gossip_age_ms": null},
                {"node_id": 2, "region": "ams", "cluster_addr": "10.0.0.2:7071", "admin_addr": "10.0.0.2:7070",
                 "role": "learner", "is_leader": false, "last_gossip_age_ms": 42},
            ]}}))
        .unwrap();
        assert_eq!(
            render_status(&data, Format::Table),
            "node 1 sees leader 1, term 3, commit index 9, applied index 9 (* = this node)
NODE  REGION  ROLE     LEADER  CLUSTER ADDR   ADMIN ADDR     GOSSIP AGE
1*    fra     voter    yes     10.0.0.1:7071  10.0.0.1:7070  -
2     ams     learner          10.0.0.2:7071  10.0.0.2:7070  42ms
"
        );
        let list = render_status(&data, Format::List);
        assert!(list.contains("\n  gossip age: 42ms\n"), "{list}");
    }
}
