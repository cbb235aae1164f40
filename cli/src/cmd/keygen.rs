//! `tidepool keygen`: write a new Ed25519 key file and print its public key.

use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;
use tidepool_proto::{KeyRole, SecretKey};

#[derive(clap::Args)]
pub struct Args {
    /// What the key is for: publisher, pool, node or client.
    #[arg(long)]
    role: KeyRole,
    /// Where to write the key (mode 0600).
    #[arg(long, short)]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> anyhow::Result<std::process::ExitCode> {
    let key = SecretKey::generate(a.role, &ring::rand::SystemRandom::new())?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if a.force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&a.out).with_context(|| {
        format!(
            "cannot create {} (use --force to overwrite)",
            a.out.display()
        )
    })?;
    f.write_all(key.to_text().as_bytes())?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "role": a.role.as_str(), "public": key.public().to_string(), "file": a.out })
        );
    } else {
        println!("{}", key.public());
        eprintln!("{} key written to {}", a.role.as_str(), a.out.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
