//! `tidepool keygen`: write a new Ed25519 key file and print its public key.

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
    super::common::write_key(&a.out, &key, a.force)?;
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
