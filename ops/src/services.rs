//! `edgectl service …` and `edgectl instance …`: the `/v1/services` routes.

use edgelb_api::model::{ServiceGroup, parse_port_specs};
use edgelb_api::services::{GroupsData, InstanceView, InstancesData};
use edgelb_api::validate::check_services;
use serde_json::{Value, json};

use crate::cli::{CreateArgs, InstanceCmd, ServiceCmd, SetArgs};
use crate::client::segment;
use crate::error::{Failure, Outcome};
use crate::output::{self, Format};
use crate::{Ctx, emit};

/// Runs `edgectl service …`.
pub async fn service(ctx: &Ctx, cmd: ServiceCmd) -> Outcome {
    match cmd {
        ServiceCmd::Create(args) => create(ctx, args).await,
        ServiceCmd::List => {
            let data: GroupsData = ctx.client()?.get("/v1/services").await?;
            print_groups(ctx, &data, Format::Table);
            Ok(())
        }
        ServiceCmd::Get { id } => {
            let data: GroupsData = ctx
                .client()?
                .get(&format!("/v1/services/{}", segment(&id)))
                .await?;
            print_groups(ctx, &data, Format::List);
            Ok(())
        }
        ServiceCmd::Rm { ids, force } => remove(ctx, &ids, force).await,
        ServiceCmd::Set(args) => set(ctx, &args).await,
    }
}

/// The health check `--health-check` gives, checked as the API checks it;
/// a usage error otherwise.
fn health_check(spec: &str) -> Outcome<edgelb_api::model::HealthCheck> {
    let check: edgelb_api::model::HealthCheck = spec.parse().map_err(Failure::usage)?;
    edgelb_api::validate::check_health_check(&check)
        .map_err(|e| Failure::usage(format!("health check {spec:?}: {e}")))?;
    Ok(check)
}

/// The `PATCH /v1/services/{id}` bodies for `args`, in order; a usage
/// error when there are none or a check does not parse.
fn set_bodies(args: &SetArgs) -> Outcome<Vec<Value>> {
    let mut bodies = Vec::new();
    if let Some(limit) = args.hard_limit {
        bodies.push(json!({"prop": "hard_limit", "op": "set", "value": limit}));
    }
    if let Some(spec) = &args.health_check {
        let check = health_check(spec)?;
        bodies.push(json!({"prop": "health_check", "op": "set", "value": check}));
    }
    if args.no_health_check {
        bodies.push(json!({"prop": "health_check", "op": "del", "value": null}));
    }
    if let Some(version) = &args.send_proxy_protocol {
        bodies.push(json!({"prop": "send_proxy_protocol", "op": "set", "value": version}));
    }
    if args.no_send_proxy_protocol {
        bodies.push(json!({"prop": "send_proxy_protocol", "op": "del", "value": null}));
    }
    if bodies.is_empty() {
        return Err(Failure::usage(
            "nothing to set: give --hard-limit, --health-check, --no-health-check, --send-proxy-protocol or --no-send-proxy-protocol",
        ));
    }
    Ok(bodies)
}

/// `edgectl service set`: each change a PATCH; prints the group as the
/// last one left it.
async fn set(ctx: &Ctx, args: &SetArgs) -> Outcome {
    let bodies = set_bodies(args)?;
    let client = ctx.client()?;
    let path = format!("/v1/services/{}", segment(&args.id));
    let mut last = None;
    for body in &bodies {
        last = Some(client.patch::<GroupsData>(&path, body).await?);
    }
    if let Some(data) = last {
        print_groups(ctx, &data, Format::List);
    }
    Ok(())
}

/// The `POST /v1/services` body for `args`. Port specs are parsed and
/// checked here, so a bad one is a usage error that names it.
pub fn create_body(args: &CreateArgs) -> Outcome<Value> {
    let specs: Vec<&str> = args.specs.iter().map(String::as_str).collect();
    let services = parse_port_specs(&specs).map_err(Failure::usage)?;
    check_services(&services).map_err(|e| {
        let quoted: Vec<String> = specs.iter().map(|s| format!("{s:?}")).collect();
        let noun = if specs.len() == 1 { "spec" } else { "specs" };
        Failure::usage(format!("invalid port {noun} {}: {e}", quoted.join(" ")))
    })?;
    let mut body = json!({ "services": services });
    if let Some(name) = &args.name {
        body["name"] = json!(name);
    }
    if !args.domains.is_empty() {
        let domains: Vec<Value> = args.domains.iter().map(|d| json!({"name": d})).collect();
        body["domains"] = Value::Array(domains);
    }
    if let Some(limit) = args.hard_limit {
        body["hard_limit"] = json!(limit);
    }
    if let Some(spec) = &args.health_check {
        body["health_check"] = json!(health_check(spec)?);
    }
    if let Some(version) = &args.send_proxy_protocol {
        body["send_proxy_protocol"] = json!(version);
    }
    Ok(body)
}

async fn create(ctx: &Ctx, args: CreateArgs) -> Outcome {
    let body = create_body(&args)?;
    let data: GroupsData = ctx.client()?.post("/v1/services", &body).await?;
    print_groups(ctx, &data, Format::List);
    Ok(())
}

/// Deletes each group; every failure is reported, the first sets the exit
/// code.
async fn remove(ctx: &Ctx, ids: &[String], force: bool) -> Outcome {
    let client = ctx.client()?;
    let query = if force { "?force=true" } else { "" };
    let mut failures = Vec::new();
    let mut removed = Vec::new();
    for id in ids {
        let path = format!("/v1/services/{}{query}", segment(id));
        match client.delete::<GroupsData>(&path).await {
            Ok(data) => removed.extend(data.service_groups),
            // Nothing later can succeed without a connection.
            Err(e @ Failure::Connect { .. }) => {
                failures.push(e);
                break;
            }
            Err(e) => failures.push(e),
        }
    }
    match ctx.format(Format::List) {
        Format::Json => emit(&output::json(&GroupsData {
            service_groups: removed,
        })),
        _ => {
            for g in &removed {
                emit(&format!("removed {} ({})\n", g.name, g.uuid));
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.remove(0)),
        _ => Err(Failure::Many(failures)),
    }
}

fn print_groups(ctx: &Ctx, data: &GroupsData, default: Format) {
    let groups: &[ServiceGroup] = &data.service_groups;
    emit(&match ctx.format(default) {
        Format::Table => output::groups_table(groups, ctx.now),
        Format::List => output::groups_list(groups, ctx.now),
        Format::Json => output::json(data),
    });
}

/// Runs `edgectl instance …`.
pub async fn instance(ctx: &Ctx, cmd: InstanceCmd) -> Outcome {
    let client = ctx.client()?;
    match cmd {
        InstanceCmd::Attach {
            service,
            address,
            name,
        } => {
            let mut body = json!({ "address": address });
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            let path = format!("/v1/services/{}/instances", segment(&service));
            let data: InstancesData = client.post(&path, &body).await?;
            print_instances(ctx, &data, Format::List);
        }
        InstanceCmd::Detach { service, instance } => {
            let path = format!(
                "/v1/services/{}/instances/{}",
                segment(&service),
                segment(&instance)
            );
            let data: InstancesData = client.delete(&path).await?;
            match ctx.format(Format::List) {
                Format::Json => emit(&output::json(&data)),
                _ => {
                    for i in &data.instances {
                        emit(&format!(
                            "detached {} ({}); draining {} in flight\n",
                            i.name, i.uuid, i.load.local
                        ));
                    }
                }
            }
        }
        InstanceCmd::List { service } => {
            let path = format!("/v1/services/{}/instances", segment(&service));
            let data: InstancesData = client.get(&path).await?;
            print_instances(ctx, &data, Format::Table);
        }
    }
    Ok(())
}

fn print_instances(ctx: &Ctx, data: &InstancesData, default: Format) {
    let state = |i: &InstanceView| json!(i.state).as_str().unwrap_or_default().to_owned();
    emit(&match ctx.format(default) {
        Format::Json => output::json(data),
        Format::List => output::blocks(data.instances.iter().map(|i| {
            output::block(&[
                ("uuid", i.uuid.to_string()),
                ("name", i.name.clone()),
                ("address", i.address.clone()),
                ("state", state(i)),
                ("local", i.load.local.to_string()),
                ("global", i.load.global.to_string()),
            ])
        })),
        Format::Table => {
            let rows: Vec<Vec<String>> = data
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.uuid.to_string(),
                        i.address.clone(),
                        state(i),
                        i.load.local.to_string(),
                        i.load.global.to_string(),
                    ]
                })
                .collect();
            output::table(
                &["NAME", "UUID", "ADDRESS", "STATE", "LOCAL", "GLOBAL"],
                &rows,
            )
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(specs: &[&str]) -> CreateArgs {
        CreateArgs {
            name: Some("web".into()),
            domains: vec!["web.example.com".into()],
            hard_limit: Some(10),
            health_check: None,
            send_proxy_protocol: None,
            specs: specs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn health_checks_and_proxy_headers_go_into_the_body() {
        let mut a = args(&["9000"]);
        a.health_check = Some("http:/healthz,fall=5".into());
        a.send_proxy_protocol = Some("v2".into());
        let body = create_body(&a).unwrap();
        assert_eq!(body["send_proxy_protocol"], "v2");
        let c = &body["health_check"];
        assert_eq!(
            (c["type"].as_str(), c["path"].as_str()),
            (Some("http"), Some("/healthz"))
        );
        assert_eq!((c["fall"].as_u64(), c["rise"].as_u64()), (Some(5), Some(2)));
        for bad in ["icmp", "http:/h,interval_ms=5", "tcp,expect=200"] {
            a.health_check = Some(bad.into());
            let e = create_body(&a).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
    }

    #[test]
    fn the_443_shorthand_expands() {
        let body = create_body(&args(&["443:8080"])).unwrap();
        assert_eq!(
            body,
            json!({
                "name": "web",
                "domains": [{"name": "web.example.com"}],
                "hard_limit": 10,
                "services": [
                    {"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]},
                    {"port": 80, "destination_port": 443, "handlers": ["http", "redirect"]},
                ],
            })
        );
    }

    #[test]
    fn bad_specs_are_usage_errors_naming_the_spec() {
        let e = create_body(&args(&["80:x"])).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("\"80:x\""), "{e}");
        let e = create_body(&args(&["8080/http+tcp"])).unwrap_err();
        assert!(e.to_string().contains("tcp"), "{e}");
        let e = create_body(&args(&["80/redirect"])).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .starts_with("invalid port spec \"80/redirect\": "),
            "{e}"
        );
    }
}
