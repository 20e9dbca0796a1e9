//! `edgectl certs init|node`: a cluster CA and node certificates for
//! operators who run their own PKI (`edgelb --ca-cert --node-cert
//! --node-key`), made with the node's own [`edgelb_client::pki`] so they are
//! exactly what the cluster endpoint expects.
//!
//! ```text
//!  certs init --out DIR        ─▶ DIR/ca.pem, DIR/ca.key (0600)
//!  certs node ID --ca DIR --out DIR2 ─▶ DIR2/node-ID.pem (SAN node-ID.cluster.edgelb), DIR2/node-ID.key (0600)
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use edgelb_client::pki::{self, CaBundle};

use crate::cli::CertsCmd;
use crate::emit;
use crate::error::{Failure, Outcome};

/// Runs `edgectl certs …`.
pub fn run(cmd: CertsCmd) -> Outcome {
    match cmd {
        CertsCmd::Init { out, force } => {
            let (cert, key) = init(&out, force)?;
            emit(&format!(
                "wrote the cluster CA: {} and {} (keep the key offline; it signs node certificates)\n",
                cert.display(),
                key.display()
            ));
        }
        CertsCmd::Node { id, ca, out, force } => {
            let (cert, key) = node(id, &ca, &out, force)?;
            emit(&format!(
                "wrote {} and {} for {}; start the node with\n  edgelb --node-id {id} --ca-cert {} --node-cert {} --node-key {}\n",
                cert.display(),
                key.display(),
                pki::node_dns_name(id),
                ca.join("ca.pem").display(),
                cert.display(),
                key.display()
            ));
        }
    }
    Ok(())
}

/// Creates a cluster CA in `out`: (`ca.pem`, `ca.key`).
pub fn init(out: &Path, force: bool) -> Outcome<(PathBuf, PathBuf)> {
    let cert = out.join("ca.pem");
    let key = out.join("ca.key");
    refuse_existing(&[&cert, &key], force)?;
    let ca = pki::generate_ca("edgelb").map_err(Failure::local)?;
    create_dir(out)?;
    write(&cert, &ca.cert_pem, false, force)?;
    write(&key, &ca.key_pem, true, force)?;
    Ok((cert, key))
}

/// Issues node `id`'s certificate with the CA in `ca_dir`, into `out`:
/// (`node-<id>.pem`, `node-<id>.key`).
pub fn node(id: u64, ca_dir: &Path, out: &Path, force: bool) -> Outcome<(PathBuf, PathBuf)> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                " (create a CA with `edgectl certs init`, or point --ca at its directory)"
            } else {
                ""
            };
            Failure::local(format!("reading {}: {e}{hint}", path.display()))
        })
    };
    let ca = CaBundle {
        cert_pem: read("ca.pem")?,
        key_pem: read("ca.key")?,
    };
    let cert = out.join(format!("node-{id}.pem"));
    let key = out.join(format!("node-{id}.key"));
    refuse_existing(&[&cert, &key], force)?;
    let (cert_pem, key_pem) = pki::issue_node_cert(&ca, id)
        .map_err(|e| Failure::local(format!("the CA in {}: {e}", ca_dir.display())))?;
    create_dir(out)?;
    write(&cert, &cert_pem, false, force)?;
    write(&key, &key_pem, true, force)?;
    Ok((cert, key))
}

fn refuse_existing(paths: &[&Path], force: bool) -> Outcome {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(Failure::local(format!(
            "{} already exists (pass --force to overwrite it)",
            p.display()
        ))),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Outcome {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::local(format!("creating {}: {e}", dir.display())))
}

/// Writes `contents`; private files are created with mode 0600.
pub(crate) fn write(path: &Path, contents: &str, private: bool, force: bool) -> Outcome {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let fail = |e: std::io::Error| Failure::local(format!("writing {}: {e}", path.display()));
    let mut f = opts.open(path).map_err(fail)?;
    #[cfg(unix)]
    if private {
        // An existing file overwritten with --force keeps its old mode.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    f.write_all(contents.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)
}
