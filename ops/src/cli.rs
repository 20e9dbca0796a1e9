//! The command line (SPEC §8), as clap derive types.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clap_complete::Shell;

use crate::error::EXIT_CODES_HELP;
use crate::output::Format;

/// The admin URL used when neither `--api` nor `EDGELB_API` is given.
pub const DEFAULT_API: &str = "http://127.0.0.1:7070";

/// `edgectl`: operate an edgelb cluster through its admin API.
#[derive(Debug, Parser)]
#[command(
    name = "edgectl",
    version,
    about = "Operate an edgelb cluster: services, instances, nodes, certificates",
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Admin API of any cluster member
    #[arg(long, global = true, env = "EDGELB_API", default_value = DEFAULT_API)]
    pub api: String,
    /// Admin token [default: the token file of the data dir, ./edgelb-data/token
    /// or $EDGELB_DATA_DIR/token]
    #[arg(long, global = true, env = "EDGELB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that verifies an https:// --api: the cluster CA
    /// (<data dir>/tls/ca.pem) or the CA of the operator's certificate
    #[arg(long, global = true, env = "EDGELB_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Output format of commands that list [default: table for lists, list for
    /// one item]
    #[arg(short = 'o', long = "output", global = true, value_enum)]
    pub output: Option<Format>,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Service groups: published ports, domains, instances
    #[command(subcommand, visible_alias = "services")]
    Service(ServiceCmd),
    /// Instances (backends) of a service
    #[command(subcommand, visible_alias = "instances")]
    Instance(InstanceCmd),
    /// Cluster membership, and a local cluster for trying edgelb out
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Certificates for operators running their own PKI
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell
        shell: Shell,
    },
}

/// `edgectl service …`
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service group
    #[command(after_help = PORTSPEC_HELP)]
    Create(CreateArgs),
    /// List service groups
    #[command(visible_alias = "ls")]
    List,
    /// Show one service group
    Get {
        /// Name or uuid
        #[arg(value_name = "NAME|UUID")]
        id: String,
    },
    /// Change a service group's hard limit, health check or PROXY protocol
    /// header to instances (one PATCH each, in that order)
    Set(SetArgs),
    /// Delete service groups
    #[command(visible_alias = "remove", alias = "delete")]
    Rm {
        /// Names or uuids
        #[arg(value_name = "NAME|UUID", required = true)]
        ids: Vec<String>,
        /// Delete even with instances attached (they are detached and drain)
        #[arg(long)]
        force: bool,
    },
}

/// `edgectl service set`.
#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// Name or uuid
    #[arg(value_name = "NAME|UUID")]
    pub id: String,
    /// Max in-flight connections/requests per instance
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub hard_limit: Option<u32>,
    /// Active health check: `tcp` or `http[:PATH]`, then `,key=value`
    /// options (as for `service create`)
    #[arg(long, value_name = "CHECK", conflicts_with = "no_health_check")]
    pub health_check: Option<String>,
    /// Remove the health check (instances go back to passive marking)
    #[arg(long)]
    pub no_health_check: bool,
    /// TCP mode: start each connection to an instance with a PROXY protocol
    /// header
    #[arg(
        long,
        value_name = "VERSION",
        value_parser = ["v1", "v2"],
        conflicts_with = "no_send_proxy_protocol"
    )]
    pub send_proxy_protocol: Option<String>,
    /// Send no PROXY protocol header to instances
    #[arg(long)]
    pub no_send_proxy_protocol: bool,
}

const PORTSPEC_HELP: &str = "\
Port specs: EXT:INT[/h1+h2] publishes EXT and forwards to INT on every instance;
a bare P means P:P. Handlers: tls (terminate TLS), http (HTTP mode, balanced
per request; without it the port is TCP mode, balanced per connection),
redirect (with http: 308 to the TLS port INT). Exactly one spec 443:INT with no
handlers expands to 443:INT/tls+http 80:443/http+redirect.

Examples:
  edgectl service create -n web 443:8080
  edgectl service create -n api -d api.example.com 8000:8080/http 9000:5432";

/// `edgectl service create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name (a-z, 0-9, '-'; starts with a letter) [default: generated]
    #[arg(short = 'n', long)]
    pub name: Option<String>,
    /// A domain routed to the service (repeat for more) [default:
    /// <name>.<cluster_domain>]
    #[arg(short = 'd', long = "domain", value_name = "DOMAIN")]
    pub domains: Vec<String>,
    /// Max in-flight connections/requests per instance [default: 65535]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub hard_limit: Option<u32>,
    /// Active health check of the instances, run by every node: `tcp` or
    /// `http[:PATH]`, then `,key=value` options: expect=200-399, port,
    /// interval_ms=2000, timeout_ms=1000, rise=2, fall=3
    #[arg(long, value_name = "CHECK")]
    pub health_check: Option<String>,
    /// TCP mode: start each connection to an instance with a PROXY protocol
    /// header naming the client
    #[arg(long, value_name = "VERSION", value_parser = ["v1", "v2"])]
    pub send_proxy_protocol: Option<String>,
    /// Published ports: EXT:INT[/h1+h2]
    #[arg(value_name = "PORTSPEC", required = true)]
    pub specs: Vec<String>,
}

/// `edgectl instance …`
#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Attach an instance to a service (it is selectable at once)
    Attach {
        /// Service name or uuid
        service: String,
        /// IP address or host name of the instance (no port: it listens on
        /// each port's INT)
        #[arg(long)]
        address: String,
        /// Instance name [default: generated]
        #[arg(long)]
        name: Option<String>,
    },
    /// Detach an instance (out of selection at once; in-flight work drains)
    Detach {
        /// Service name or uuid
        service: String,
        /// Instance name or uuid
        instance: String,
    },
    /// List a service's instances with their state and load
    #[command(visible_alias = "ls")]
    List {
        /// Service name or uuid
        service: String,
    },
}

/// `edgectl cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Show the members, roles, leader and Raft indexes as one node sees them
    Status,
    /// Add a node (as a learner) that runs your own PKI; nodes started with
    /// --join add themselves
    AddNode {
        /// The new node's id
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        node_id: u64,
        /// The cluster (QUIC, UDP) address its peers dial, IP:PORT (its
        /// --advertise-cluster-addr when it has one)
        #[arg(long)]
        cluster_addr: String,
        /// Its admin API address, IP:PORT
        #[arg(long)]
        admin_addr: String,
        /// Its region
        #[arg(long, default_value = "local")]
        region: String,
    },
    /// Remove a node from the membership
    RemoveNode {
        /// The node's id
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Write a backup of the replicated state (groups, instances,
    /// certificates, the cluster CA) to FILE, mode 0600; `edgelb --restore
    /// FILE` founds a new cluster from it
    Backup {
        /// Where to write it (refused if it exists, unless --force)
        file: PathBuf,
        /// The node's own applied copy, without asking the leader (works
        /// without a quorum; may miss the latest writes)
        #[arg(long)]
        stale: bool,
        /// Overwrite FILE
        #[arg(long)]
        force: bool,
    },
    /// Run an N-node cluster on loopback until Ctrl-C (for trying edgelb out)
    ///
    /// Node k binds --base-ip + (k-1): its published ports, its admin API on
    /// :7070 and its cluster port on :7071. Node 1 founds the cluster with
    /// --token (EDGELB_TOKEN) when given, else a generated token; the others
    /// join it. A node that exits leaves the others running; `cluster local
    /// --data-dir DIR start-node K` (from any terminal) starts it again.
    /// Ctrl-C or SIGTERM stops every node.
    Local(LocalArgs),
}

/// `edgectl cluster local`.
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// How many nodes
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub nodes: u16,
    /// Node 1's IP; node k gets this + (k-1) (each node binds its own IP)
    #[arg(long, default_value = "127.0.0.11")]
    pub base_ip: Ipv4Addr,
    /// The edgelb binary [default: next to edgectl, else edgelb on PATH]
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Where node-1, node-2, … keep their data and logs (kept; a second run
    /// restarts the same cluster); for start-node, the running cluster's
    /// (as it printed it) [default: a temp dir removed at exit]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// How long to wait for every node to be ready, in seconds
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// The nodes' log filter (written to each node's edgelb.log)
    #[arg(long, default_value = "info,openraft=warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Option<LocalCmd>,
}

/// `edgectl cluster local --data-dir DIR …`: talk to a running local
/// cluster.
#[derive(Debug, Subcommand)]
pub enum LocalCmd {
    /// Start a stopped node of the `cluster local` running on --data-dir
    /// again, and wait (up to --timeout) until it is back in the cluster
    StartNode {
        /// The node's number (1 to --nodes)
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        id: u16,
    },
}

/// `edgectl certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create a cluster CA: ca.pem and ca.key
    Init {
        /// Directory to write to
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Overwrite existing files
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate (node-ID.pem, node-ID.key) naming
    /// node-ID.cluster.edgelb, signed by the CA
    Node {
        /// The node's id
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Directory holding ca.pem and ca.key
        #[arg(long, default_value = ".")]
        ca: PathBuf,
        /// Directory to write to
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Overwrite existing files
        #[arg(long)]
        force: bool,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3  cannot connect"), "{help}");
    }
}
