//! `tidepool keygen`: write a new Ed25519 key file and print its public key.

use anyhow::Context as _;
use std::path::PathBuf;
use tidepool_proto::{KeyRole, SecretKey};

#[derive(clap::Args)]
pub struct Args {
    /// What the key is for: publisher, pool, node or client.
    #[arg(long)]
    role: KeyRole,
    /// Where to write the key (mode 0600; default: ROLE.key in
    /// $XDG_CONFIG_HOME/tidepool, i.e. ~/.config/tidepool, where `pool
    /// serve` and `node run` look by default).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> anyhow::Result<std::process::ExitCode> {
    let key = SecretKey::generate(a.role, &ring::rand::SystemRandom::new())?;
    let out = match a.out {
        Some(p) => p,
        None => {
            let dir = tidepool_host::models::config_dir();
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir.join(format!("{}.key", a.role.as_str()))
        }
    };
    super::common::write_key(&out, &key, a.force)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "role": a.role.as_str(), "public": key.public().to_string(), "file": out })
        );
    } else {
        println!("{}", key.public());
        eprintln!("{} key written to {}", a.role.as_str(), out.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
