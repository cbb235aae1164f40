//! `tidepool bundle pack|sign|verify|publish`.

use super::common::{read_key, runtime, PoolArgs};
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use tidepool_client::bundle::{pack, BundleFile};
use tidepool_proto::PublicKey;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Lock a tidepool.toml into a bundle file with every digest (unsigned).
    Pack {
        /// The manifest.
        #[arg(default_value = "tidepool.toml")]
        manifest: PathBuf,
        /// The publisher's key file (its public key goes into the manifest).
        #[arg(long)]
        key: PathBuf,
        /// Sign at once with the same key.
        #[arg(long)]
        sign: bool,
        /// Output file (default NAME-VERSION.bundle next to the manifest).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Sign a packed bundle with the publisher's key.
    Sign {
        /// The bundle file.
        bundle: PathBuf,
        /// The publisher's key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a bundle's signature, validity and files.
    Verify {
        /// The bundle file.
        bundle: PathBuf,
        /// Trusted publisher keys (default: the bundle's own signer).
        #[arg(long = "publisher")]
        publishers: Vec<PublicKey>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish a signed bundle to a pool and upload its blobs.
    Publish {
        /// The bundle file.
        bundle: PathBuf,
        #[command(flatten)]
        pool: PoolArgs,
    },
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Pack {
            manifest,
            key,
            sign,
            out,
        } => {
            let key = read_key(&key)?;
            let mut b = pack(&manifest, key.public())?;
            if sign {
                b.sign(&key)?;
            }
            let m = b.manifest()?;
            let out = out.unwrap_or_else(|| {
                manifest
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join(format!("{}-{}.bundle", m.name, m.version))
            });
            b.write(&out)?;
            println!("{}", out.display());
            eprintln!(
                "packed {} {} ({} model(s)){}",
                m.name,
                m.version,
                m.models.len(),
                if sign { ", signed" } else { "" }
            );
        }
        Command::Sign { bundle, key } => {
            let mut b = BundleFile::read(&bundle)?;
            b.sign(&read_key(&key)?)
                .with_context(|| bundle.display().to_string())?;
            b.write(&bundle)?;
            eprintln!("signed {}", bundle.display());
        }
        Command::Verify {
            bundle,
            publishers,
            json,
        } => {
            let b = BundleFile::read(&bundle)?;
            let mut trusted: BTreeSet<PublicKey> = publishers.into_iter().collect();
            if trusted.is_empty() {
                trusted.extend(b.signature.map(|(k, _)| k));
            }
            let m = b.verify(&bundle, &trusted)?;
            let digest = b.signed().map(|s| s.digest()).context("unsigned")?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "bundle": digest.to_string(), "name": m.name, "version": m.version,
                    "publisher": m.publisher.to_string(), "expires_at": m.expires_at, "component": m.component.sha256.to_string() })
                );
            } else {
                println!(
                    "ok: {} {} {digest}, signed by {}, valid until {} (unix)",
                    m.name, m.version, m.publisher, m.expires_at
                );
            }
        }
        Command::Publish { bundle, pool } => {
            let b = BundleFile::read(&bundle)?;
            let total: u64 = b
                .files
                .values()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            let digest = runtime()?.block_on(async {
                let client = pool.connect().await?;
                let bar = indicatif::ProgressBar::new(total).with_message("uploading");
                bar.set_style(indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes}",
                )?);
                let d = client.publish(&b, |n| bar.inc(n)).await?;
                bar.finish_and_clear();
                client.close().await;
                anyhow::Ok(d)
            })?;
            println!("{digest}");
            eprintln!("published {}", bundle.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
